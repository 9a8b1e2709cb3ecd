"""The engine core and the link between it and the worker (vLLM v1's EngineCore split).

`core.EngineCore` is the loop that owns an engine: it applies commands between steps,
steps, and hands back one StepResult per step; it does no I/O of its own. The worker
runs it either in a thread of its own process (engine_worker/worker/engine_thread.py)
or in a child process (`client.EngineProcess` spawns `proc`, which wraps the core with
a socket), so the engine's Python work and the worker's NATS work do not share a GIL.
Every message that crosses the boundary is declared in `messages`; `codec` and
`frames` put them on the socket.
"""
