"""Every judge, in one place, and how their verdicts become the paper's comparison table.

``refusal`` is the keyword refusal detector the pipeline's own stages use (induce, evaluate);
``offline`` the embedded MiniLM harm and refusal classifiers; ``verdicts`` the judging prompts and
the strict parser of an LLM judge's verdict; ``http`` sends them to an OpenAI-compatible
chat-completions endpoint through Ray Data; ``scoring`` runs the configured judge over the
comparison's answers; ``report`` turns verdicts into per-method scores with bootstrap confidence
intervals, and ``compare_report`` writes them as Markdown, JSON and a chart (Chen et al., ICLR
2024, section 4).
"""
