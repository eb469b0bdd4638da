"""``python -m stream_rnn`` = the ``stream-rnn`` command."""

from stream_rnn.ops.cli import main

main()
