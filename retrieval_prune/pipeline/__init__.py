"""The one path from a corpus to an index: ``data -> model -> table -> tokens -> codec -> index``.

:mod:`.spec` parses a pipeline spec (all stages, aliases such as ``default``) into a
:class:`Pipeline`; :mod:`.build` runs it -- corpus, encoder, cached encoding, token steps,
codec fit, index, in memory or streamed under a memory cap; :mod:`.executors` maps work over
shards (``local`` now; a distributed backend adds an executor). The CLI, the Retriever, the
evaluation runner, ``bench plaid`` and the scripts all build through here.
"""

from retrieval_prune.pipeline.spec import ALIASES, STAGE_ORDER, Pipeline, make_pipeline

__all__ = ["ALIASES", "STAGE_ORDER", "Pipeline", "make_pipeline"]
