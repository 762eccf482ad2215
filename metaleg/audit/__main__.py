"""``python -m metaleg.audit``: the SNAT audit process (started by the supervisor when
``AUDIT_LOG=on``)."""

from metaleg.lifecycle import start_worker


def main() -> None:
    config = start_worker("audit")
    from metaleg.audit.process import AuditProcess

    raise SystemExit(AuditProcess(config).run())


main()
