"""The device runtime: bundle format and loading, the TFLite interpreter, preprocessing, exit rules, the Runner."""
