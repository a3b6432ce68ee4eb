"""``vgpuctl serve``: the HTTP service (FastAPI on uvicorn) over the same library the CLI uses.

Layers: this package imports :mod:`vgpuctl.host`, :mod:`vgpuctl.mdev` and :mod:`vgpuctl.vm`, never
:mod:`vgpuctl.cli`. :func:`vgpuctl.service.app.create_app` builds the application:

- ``/api/v1/...`` the REST API (:mod:`.api`), OpenAPI at ``/openapi.json``; errors are JSON
  ``{"error": kind, "message": what to do}`` (:mod:`.errors`);
- ``/api/v1/events`` server-sent events with live snapshots (:mod:`.events`);
- ``/metrics`` Prometheus text (:mod:`.metrics`, with the hook the display streaming code feeds);
- ``/login``, ``/logout`` and the dashboard's static files (``web/``) at ``/``;
- every request authenticated by the bearer token in ``<state-dir>/token`` or the session cookie
  that ``POST /login`` sets (:mod:`.auth`).
"""
