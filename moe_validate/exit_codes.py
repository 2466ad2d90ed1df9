"""The exit statuses of every ``moe-validate`` command, in one table (README and ``--help`` show it)."""

EXIT_PASS = 0
EXIT_FAILURES = 1
EXIT_USAGE = 2
EXIT_INCOMPLETE = 3
EXIT_HARNESS = 4
EXIT_INTERRUPTED = 130

EXIT_CODES = (
    (EXIT_PASS, "pass: every expected case ran and passed or was skipped (compare: no regressions); a "
                "conformance FAIL that does not gate (third-party backends by default) is a summary line, not a status"),
    (EXIT_FAILURES, "case failures: a case failed a gating verdict (accuracy, and conformance where it gates), "
                    "crashed or timed out (compare: new failures or drift; compare --outputs: outputs beyond --max-ulp)"),
    (EXIT_USAGE, "usage error: bad argument or input file, one line on stderr"),
    (EXIT_INCOMPLETE, "incomplete: expected cases missing or not run, a run without its footer, or (run --max-skip) "
                      "more cases skipped than allowed"),
    (EXIT_HARNESS, "harness error: results could not be written (disk full, output gone), one line"),
    (EXIT_INTERRUPTED, "interrupted (Ctrl-C): what finished is kept and reported"),
)
