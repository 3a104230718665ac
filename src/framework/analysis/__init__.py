"""Above the runs: reports, statistics, tables and figures of finished runs, the experiments that plan and launch
them (`python -m framework.analysis.experiments`), sweep tables, and the over-optimisation and monitor studies."""
