"""The auditor's pages: search of the ledger, the decision page (what a reviewer saw, with its hash
recomputed), the run replay, and the streaming export of a search's records.

``search`` parses the filters once for the page, its htmx partial and both exports, and builds
the queryset; ``selectors`` reads what the decision page and the replay show; ``services``
records an export in the ledger; ``export`` streams it."""
