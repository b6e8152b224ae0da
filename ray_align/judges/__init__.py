"""LLM judges for the paper's comparison table (Chen et al., ICLR 2024, section 4).

``verdicts`` holds the judging prompts and the strict parser of a judge's verdict, ``http`` sends
them to an OpenAI-compatible chat-completions endpoint through Ray Data, and ``report`` turns
the verdicts into per-method scores with bootstrap confidence intervals and a Markdown table.
"""
