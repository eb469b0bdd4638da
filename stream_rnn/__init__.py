"""stream_rnn: real-time recurrent-network inference over Kafka streams.

Layers, from the inside out: ``model`` (the maths), ``train`` (BPTT, data),
``registry`` (checkpoints), ``engine`` (state pool, batched step), ``stream``
(Kafka), ``ops`` (CLI, metrics, local broker).
"""

__version__ = "0.1.0"
