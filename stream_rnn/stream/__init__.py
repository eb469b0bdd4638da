"""The Kafka side: message schemas and wire codec (`messages`, `codec`), the worker, dead letters.

Import the submodules directly (``from stream_rnn.stream.codec import decode_event``); this
package module stays empty so that importing one piece does not pull in Kafka clients.
"""
