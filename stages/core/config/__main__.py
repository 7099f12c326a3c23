"""`python -m stages.core.config > docs/options.md` (`make docs`)."""

from stages.core.config.commands import options_markdown

print(options_markdown(), end="")
