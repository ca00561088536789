"""Tables, statistics and figures from run folders (never imports training code)."""

from atlasfl.report.summary import summarize
from atlasfl.report.table import format_table
from atlasfl.runfiles import read_run

__all__ = ["format_table", "read_run", "summarize"]
