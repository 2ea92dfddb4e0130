"""The page: a toolbar (open, upload, sample, window/level), a side panel (where the model runs and its state,
prompts, accept, undo/redo, propagation, segments, model, save) and Slicer's views (axial, coronal, sagittal, 3D).

Only layout and bindings are here; every handler is a method of :class:`~.app.WebApp`. The state it reads:
``sam`` (the workflow's snapshot, see :meth:`~.workflow.WebWorkflow.snapshot`) and the selectors' own keys.
Elements a test or a user script needs to find carry ``swsam-…`` ids.
"""

from __future__ import annotations

from trame.widgets import html
from trame.widgets import vuetify3 as v3
from trame_vuetify.ui.vuetify3 import VAppLayout

from SegmentWithSAMLib.preprocessing import CT_PRESETS
from SegmentWithSAMSlicerLib.settings import DEVICES, DIRECTIONS, window_choices

from .workflow import DOWNLOAD_SUFFIXES

DRAWER_WIDTH = 340
# the drawer's rows of buttons: small, sharing the row's width, wrapping rather than overflowing if ever too wide
BUTTON_ROW = "d-flex flex-wrap ga-1 mt-2"
BUTTON = {"size": "small", "classes": "flex-grow-1"}


def view_marker(_server, _view_id: str, view) -> None:
    """Populates each view's overlay: an invisible marker naming the view (``swsam-view-Red`` for axial,
    ``-Green`` coronal, ``-Yellow`` sagittal, ``-ThreeD``), so the page's image of a view can be found."""
    html.Span(id=f"swsam-view-{view.get_singleton_tag()}", classes="swsam-view", style="display: none")


def _section(title: str) -> None:
    v3.VDivider(classes="my-2")
    html.Div(title, classes="text-overline")


def build_page(app, layout_manager, models: list[str], max_upload_bytes: int) -> VAppLayout:
    """Build the page of ``app`` (a :class:`~.app.WebApp`) around ``layout_manager``'s view grid."""
    server = app.server
    upload = server.trigger_name(app.upload)
    check_and_upload = (
        "const files = [...$event.target.files]; const total = files.reduce((s, f) => s + f.size, 0);"
        f"if (total > {max_upload_bytes}) {{ upload_refused = `The file is ${{(total / 1048576).toFixed(1)}} MB; "
        f"this server takes at most {max_upload_bytes / 2**20:.0f} MB.`; }}"
        f"else if (files.length) {{ upload_refused = ''; trigger('{upload}', [files]); }}")
    download = server.trigger_name(app.download)
    with VAppLayout(server, full_height=True) as layout:
        with v3.VAppBar(density="compact", color="grey-darken-4"):
            v3.VToolbarTitle("SegmentWithSAM", style="flex: 0 0 auto", classes="mr-4")
            v3.VBtn("Colin27 sample", id="swsam-sample", prepend_icon="mdi-brain", variant="text",
                    click=app.open_sample)
            v3.VSelect(v_model=("data_choice", None), items=("data_files", []), label="Open on the server",
                       id="swsam-data-choice", density="compact", hide_details=True, style="max-width: 260px",
                       classes="mx-2")
            v3.VBtn("Open", id="swsam-open", variant="text", click=app.open_data_file, disabled=("!data_choice",))
            v3.VFileInput(id="swsam-upload", label="Upload", density="compact", hide_details=True, multiple=True,
                          prepend_icon="mdi-upload", style="max-width: 200px", classes="mx-2",
                          change=check_and_upload)
            v3.VSelect(v_model=("display_window", "volume"), items=("display_windows", ["volume", *CT_PRESETS]),
                       label="Window/level", id="swsam-display-window", density="compact", hide_details=True,
                       style="max-width: 160px", classes="mx-2")
        with v3.VNavigationDrawer(permanent=True, width=DRAWER_WIDTH):
            with html.Div(classes="pa-3 text-body-2"):
                html.Div("{{ sam.volume_name || 'No volume: open one above.' }}", id="swsam-volume",
                         classes="text-subtitle-2")
                html.Div("Backend: {{ sam.backend }}", id="swsam-backend", classes="text-caption text-medium-emphasis")
                html.Div("{{ upload_refused || sam.message }}", id="swsam-message", style="min-height: 3em",
                         classes=("(sam.error || upload_refused) ? 'my-2 text-error' : 'my-2'",))  # errors in red
                _section("Prompts")
                with v3.VBtnToggle(v_model=("place_kind", None), id="swsam-place", density="compact",
                                   divided=True, variant="outlined"):
                    v3.VBtn("Point", id="swsam-positive", value="positive", prepend_icon="mdi-plus-circle",
                            size="small", color="green")
                    v3.VBtn("Point", id="swsam-negative", value="negative", prepend_icon="mdi-minus-circle",
                            size="small", color="red")
                    v3.VBtn("Box", id="swsam-box", value="box", prepend_icon="mdi-vector-square", size="small",
                            color="amber")
                with v3.VBtnToggle(v_model=("place_kind", None), id="swsam-strokes", density="compact",
                                   divided=True, variant="outlined", classes="mt-1"):
                    v3.VBtn("Scribble", id="swsam-scribble", value="scribble", prepend_icon="mdi-draw", size="small",
                            color="green")
                    v3.VBtn("", id="swsam-negative-scribble", value="negative_scribble", icon="mdi-draw",
                            size="small", color="red")
                    v3.VBtn("Lasso", id="swsam-lasso", value="lasso", prepend_icon="mdi-lasso", size="small",
                            color="green")
                    v3.VBtn("", id="swsam-negative-lasso", value="negative_lasso", icon="mdi-lasso", size="small",
                            color="red")
                html.Div("A stroke is applied when you click its button again.", classes="text-caption")
                with html.Div(classes=BUTTON_ROW):
                    v3.VBtn("Accept", id="swsam-accept", color="primary", click=app.accept,
                            disabled=("!sam.can_accept",), **BUTTON)
                    v3.VBtn("Clear", id="swsam-clear", click=app.clear_prompts, **BUTTON)
                    v3.VBtn("Undo", id="swsam-undo", click=app.undo, disabled=("!sam.can_undo",), **BUTTON)
                    v3.VBtn("Redo", id="swsam-redo", click=app.redo, disabled=("!sam.can_redo",), **BUTTON)
                v3.VCheckbox(v_model=("auto_accept", False), label="Write 3D clicks at once", density="compact",
                             hide_details=True, id="swsam-auto-accept")
                html.Div("Points on a segment that has voxels correct it in 3D; Accept writes the correction.",
                         classes="text-caption")
                with html.Div(classes=BUTTON_ROW):
                    v3.VBtn("Suggest", id="swsam-suggest", click=app.suggest, disabled=("!sam.volume_name",),
                            prepend_icon="mdi-crosshairs-question", **BUTTON)
                    v3.VBtn("Click there", id="swsam-take-suggestion", click=app.take_suggestion,
                            disabled=("!sam.can_take_suggestion",), **BUTTON)
                v3.VCheckbox(v_model=("suggest_next", False), label="Suggest where to click after each step",
                             density="compact", hide_details=True, id="swsam-suggest-next")
                html.Div("{{ sam.suggestion }}", id="swsam-suggestion", classes="text-caption")
                _section("Propagation")
                html.Div("From {{ sam.seed || 'the slice you accept' }}; slices "
                         "{{ sam.range ? sam.range[0] + '–' + sam.range[1] + ' (the box)' : 'all' }}",
                         id="swsam-range")
                with html.Div(classes="d-flex ga-2 mt-1"):
                    v3.VSelect(v_model=("direction", "both"), items=("directions", list(DIRECTIONS)),
                               label="Direction", id="swsam-direction", density="compact", hide_details=True,
                               style="flex: 0 0 120px")
                    v3.VSelect(v_model=("skip", 0), items=("[0, 1, 2, 3, 4]",), label="Interpolate between",
                               density="compact", hide_details=True)
                with html.Div(classes=BUTTON_ROW):
                    v3.VBtn("Propagate", id="swsam-propagate", color="primary", click=app.propagate,
                            disabled=("!sam.can_propagate",), **BUTTON)
                    v3.VBtn("Cancel", id="swsam-cancel", click=app.cancel, disabled=("!sam.propagating",), **BUTTON)
                    v3.VBtn("All slices", id="swsam-all-slices", variant="text", click=app.whole_range,
                            disabled=("!sam.range",), **BUTTON)
                v3.VProgressLinear(v_if=("sam.progress",), id="swsam-progress", classes="mt-2", height=6,
                                   model_value=("sam.progress ? 100 * sam.progress[0] / sam.progress[1] : 0",))
                _section("Segments")
                with v3.VList(density="compact", id="swsam-segments"):
                    with v3.VListItem(v_for="item in sam.segments", key="item.id",
                                      active=("item.id === sam.active_segment",),
                                      click=(app.select_segment, "[item.id]")):
                        with html.Div(classes="d-flex align-center ga-1"):
                            html.Input(type="color", value=("item.color",), style="width: 28px; height: 22px",
                                       change=(app.recolor_segment, "[item.id, $event.target.value]"))
                            v3.VTextField(model_value=("item.name",), density="compact", hide_details=True,
                                          variant="plain", change=(app.rename_segment,
                                                                   "[item.id, $event.target.value]"))
                            v3.VBtn(icon=("item.visible ? 'mdi-eye' : 'mdi-eye-off'",), size="x-small",
                                    variant="text", click=(app.toggle_segment, "[item.id]"))
                            v3.VBtn(icon=("item.finished ? 'mdi-lock' : 'mdi-lock-open-variant-outline'",),
                                    size="x-small", variant="text", title="Finished: other segments keep out of it",
                                    click=(app.toggle_finished, "[item.id]"))
                            v3.VBtn(icon="mdi-delete", size="x-small", variant="text",
                                    click=(app.delete_segment, "[item.id]"))
                v3.VBtn("Add segment", id="swsam-add-segment", size="small", variant="text",
                        prepend_icon="mdi-plus", click=app.add_segment)
                _section("Model")
                html.Div("The server's own model and device (see Backend above).", v_if=("sam.server",),
                         id="swsam-server-model", classes="text-caption")
                v3.VSelect(v_model=("model", models[0]), items=("models", models), label="Model", v_if=("!sam.server",),
                           id="swsam-model", density="compact", hide_details=True)
                with html.Div(classes="d-flex ga-2 mt-2"):
                    v3.VSelect(v_model=("device", "auto"), items=("devices", list(DEVICES)), label="Device",
                               v_if=("!sam.server",), density="compact", hide_details=True)
                    v3.VSelect(v_model=("model_window", "display"), items=("windows", window_choices()),
                               label="Model window", density="compact", hide_details=True)
                v3.VBtn("Download the model", v_if=("model_download",), id="swsam-model-download",
                        size="small", click=app.download_model, classes="mt-2")
                _section("Save")
                v3.VTextField(v_model=("save_name", ""), label="File name in the data folder", id="swsam-save-name",
                              density="compact", hide_details=True)
                v3.VBtn("Save", id="swsam-save", click=app.save, disabled=("!sam.volume_name",), classes="mt-2",
                        size="small")
                with html.Div(classes="d-flex ga-2 mt-3 align-center"):
                    v3.VSelect(v_model=("download_format", DOWNLOAD_SUFFIXES[0]), label="Download as",
                               items=("formats", list(DOWNLOAD_SUFFIXES)), density="compact", hide_details=True)
                    v3.VBtn("Download", id="swsam-download", disabled=("!sam.volume_name",), size="small",
                            click=(f"utils.download(sam.segment_name + download_format, "
                                   f"trigger('{download}', [download_format]), 'application/octet-stream')"))
        with v3.VMain(), html.Div(style="position: relative; width: 100%; height: calc(100vh - 48px)",
                                  id="swsam-views"):
            layout_manager.initialize_layout_grid(layout)
    return layout
