"""The live demo in the browser: ``python -m producer_tools web``.

A small gateway between a web page and the pipeline. The page captures the microphone (or plays
an audio file at real-time pace) through an AudioWorklet at 16 kHz and sends 16-bit PCM chunks
over a websocket; the gateway publishes them as one call's ``AudioChunk`` records under a new
stream id and relays that call's committed ``TranscriptEvent`` records back to the page.

Modules, in the order a session meets them: ``settings`` (the one configuration, with every
limit), ``admission`` (pure verdicts: origin, session slots, message size), ``session`` (one
websocket's call, from admission to teardown), ``relay`` (the call's transcript reader thread),
``app`` (routes and uvicorn), ``cli`` (the ``web`` sub-command), ``static/`` (the page; no build
step, nothing from a CDN).

Nothing here is imported by ``producer_tools`` itself, so the other tools need none of the web
dependencies (the ``web`` extra).
"""
