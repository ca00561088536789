"""Tables, statistics and figures from run folders (never imports training code)."""

from atlasfl.report.summary import summarize
from atlasfl.report.table import format_table

__all__ = ["format_table", "summarize"]
