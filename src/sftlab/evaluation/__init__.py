"""Evaluation: batched generation, metrics, perplexity, multiple choice, bias probes, reports.

Modules are imported on use (`from sftlab.evaluation.evaluate import evaluate`), so importing
this package stays cheap.
"""
