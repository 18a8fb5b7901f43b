"""lessserve.workers: the serving runtime of one worker: model loading, the Llama model, the
slot slab, compression policies, the engine, chat sessions, the scheduler and the SessionStore."""
