"""Generated tasks: data sets the project writes itself (and their cold-start traces)."""
