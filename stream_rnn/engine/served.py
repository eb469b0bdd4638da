"""The model a pool serves and every table derived from it, as one replaceable object.

A model version comes with tables: its vocabulary (token strings <-> ids, the ``<unk>`` id
that unknown tokens map to), its label set, and the output heads built from both (top-k token
names, label names). Whatever turns wire tokens into ids, or ids into names, must use the
tables of the model that steps those ids. So they live in one frozen :class:`Served`, and a
swap replaces the engine's ``served`` in one assignment: nothing keeps a copy of an older
version's tables (the stream adapter reads ``engine.served`` for every micro-batch and hands
the same object back to :meth:`~stream_rnn.engine.engine.Engine.process`, which refuses
events decoded for another one).

"""

from __future__ import annotations

from dataclasses import dataclass

from stream_rnn.engine.exceptions import EngineError
from stream_rnn.engine.heads import Heads
from stream_rnn.model.network import RecurrentModel
from stream_rnn.registry.checkpoint import Manifest
from stream_rnn.train.vocab import LabelSet, Vocab


@dataclass(frozen=True, eq=False, slots=True)
class Served:
    """One model version as served: the network, its manifest and its tables.

    Compared by identity (``eq=False``): two loads of one version are different objects, and
    an event batch decoded against one of them is only valid for that one.
    """

    model: RecurrentModel
    manifest: Manifest
    vocab: Vocab
    labels: LabelSet
    heads: Heads

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def task(self) -> str:
        return self.model.config.task

    @classmethod
    def build(
        cls, model: RecurrentModel, manifest: Manifest, *, top_k: int, running_estimate: bool
    ) -> Served:
        """The tables of ``model`` from its ``manifest`` (raises if they do not fit it)."""
        vocab = Vocab.from_dict(manifest.vocab)
        labels = LabelSet.from_dict({"labels": manifest.labels or []})
        cfg = model.config
        if len(vocab) != cfg.vocab_size:
            raise EngineError(
                f"model {manifest.version}: its vocabulary has {len(vocab)} tokens but its "
                f"embedding {cfg.vocab_size}; the manifest does not belong to these weights"
            )
        if cfg.task in ("classify", "tag") and len(labels) != cfg.num_labels:
            raise EngineError(
                f"model {manifest.version}: {len(labels)} labels for {cfg.num_labels} outputs; "
                "re-export the checkpoint with its label set"
            )
        heads = Heads(model.config.task, vocab, labels, top_k, running_estimate)
        return cls(model, manifest, vocab, labels, heads)
