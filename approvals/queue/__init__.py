"""Approval requests and reviewers' decisions."""
