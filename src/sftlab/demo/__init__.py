"""The embedded demo: a generated dataset the default model learns in minutes on a CPU."""
