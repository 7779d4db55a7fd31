"""Analysis: responses, scores, statistics, figures and the report."""
