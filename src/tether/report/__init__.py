"""The HTML report of one or several runs, and the HTML building blocks other commands reuse."""
