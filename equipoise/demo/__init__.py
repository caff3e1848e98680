"""`equipoise demo`: the whole self-healing loop on one machine, with real data and real processes.

A fresh state directory and SQLite database under OUT; `equipoise serve` on the shipped default model;
`equipoise worker` polling the job queue; real MELD test conversations streamed to the service with their gold
labels sent back as feedback; `equipoise monitor run` after every window of traffic, as a cron job would. Midway
a faulty release (the default with a bias added to its neutral logit) is promoted: what the service predicts
collapses toward the majority class, the detector fires, the worker retrains (tier 2), the gate promotes the
candidate and the service hot-reloads it. OUT/report.md tells the story with per-class recall before and after.

    scenario.py   the phases, their timings and the summary
    services.py   the service, worker and CLI processes
    traffic.py    conversations streamed through the API, feedback included
    report.py     offline evaluation of the three models, PNG plots, report.md
"""
