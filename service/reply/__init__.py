"""The reply job as small steps, with no SQL of its own: `flow` orders them, `answer` writes
the reply (fixed texts, limits, the model call), `send` delivers its parts."""
