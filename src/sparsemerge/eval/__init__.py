"""Evaluation: text sources (:mod:`.data`), perplexity (:mod:`.perplexity`), decoding speed
(:mod:`.speed`), peak memory in a fresh process (:mod:`.memory`), tables and plots (:mod:`.report`)."""
