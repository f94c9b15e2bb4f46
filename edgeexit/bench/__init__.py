"""Benchmarking a bundle on a labelled data set: data sets, the benchmark, environment report, plots."""
