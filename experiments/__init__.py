"""Scripts that reproduce a paper's table or figure and write results + plots (not part of the package)."""
