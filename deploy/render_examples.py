"""The env file and unit for installs without Ansible, rendered from the
playbook's own templates with example values:

    deploy/billing-service.env.example    from billing-service.env.j2
    deploy/billing-service.service        from billing-service.service.j2

    .venv/bin/python deploy/render_examples.py            # rewrite both
    .venv/bin/python deploy/render_examples.py --check    # exit 1 if either is out of date

Rendered the way Ansible's template module renders (trim_blocks, the trailing
newline kept); the tests check both files against this.
"""
import json
import os
import sys

import jinja2

DEPLOY = os.path.dirname(os.path.abspath(__file__))
PREFIX = "/opt/billing-service"

UNIT = {
    "bs_app_dir": f"{PREFIX}/app",
    "bs_venv": f"{PREFIX}/venv",
    "bs_user": "billing-service",
    "bs_group": "billing-service",
    "bs_env_file": "/etc/billing-service/billing-service.env",
}
# The playbook's defaults, with placeholders for what only the operator knows.
# The token placeholder is shorter than 16 characters on purpose: the service
# refuses to start until it is replaced.
ENV = {
    "bs_env": {
        "DATABASE_URL": "postgresql://billing:PASSWORD@db.example:5432/account",
        "INTERNAL_SERVICE_TOKEN": "CHANGE-ME",
        "EXPORTER_SOURCES_JSON": json.dumps([{"source_id": "jp-xhttp-contabo", "base_url": "http://127.0.0.1:9108",
                                              "expected_node_id": "jp-xhttp-contabo", "expected_env": "prod"}]),
        "LISTEN_ADDR": ":8081",
        "COLLECT_INTERVAL": "1m",
        "DEFAULT_REGION": "",
        "SOURCE_REVISION": "billing-service-v1",
        "PRICE_PER_BYTE": "0",
        "INITIAL_INCLUDED_QUOTA_BYTES": "0",
        "INITIAL_BALANCE": "0",
        "IMAGE": "",
        "WEB_CONCURRENCY": "2",
    },
    "bs_tls_env": {},
    "bs_extra_env": {},
}
# file: (template, values, what to do with it: the header, in place of Ansible's "managed" line)
EXAMPLES = {
    "billing-service.env.example": ("billing-service.env.j2", ENV, [
        "Example for installs without Ansible: copy it to /etc/billing-service/billing-service.env",
        "(owner root, mode 0600) and replace DATABASE_URL, INTERNAL_SERVICE_TOKEN and EXPORTER_SOURCES_JSON.",
    ]),
    "billing-service.service": ("billing-service.service.j2", UNIT, [
        "Example for installs without Ansible: copy it to /etc/systemd/system/billing-service.service",
        "(owner root, mode 0644); it expects the paths and the user below.",
    ]),
}


def render(template: str, values: dict, managed: str = "Ansible managed") -> str:
    """The template as Ansible's template module writes it (`managed`: its ansible_managed)."""
    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(DEPLOY), trim_blocks=True,
                                     keep_trailing_newline=True, undefined=jinja2.StrictUndefined)
    # Ansible's combine, for flat dicts: later ones win.
    environment.filters["combine"] = lambda base, *more: {key: value for d in (base, *more) for key, value in d.items()}
    return environment.get_template(template).render(ansible_managed=managed, **values)


def rendered() -> dict:
    """{path of the example file: the text it must hold}"""
    texts = {}
    for name, (template, values, header) in EXAMPLES.items():
        lines = [*header, f"Rendered from deploy/{template} by deploy/render_examples.py: edit those, not this file."]
        texts[os.path.join(DEPLOY, name)] = render(template, values, "\n# ".join(lines))
    return texts


def main() -> int:
    check = sys.argv[1:] == ["--check"]
    stale = []
    for path, text in rendered().items():
        try:
            with open(path, encoding="utf-8") as handle:
                current = handle.read()
        except FileNotFoundError:
            current = None
        if current == text:
            continue
        stale.append(path)
        if not check:
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(text)
    for path in stale:
        print(f"{'out of date' if check else 'rewrote'}: {path}", file=sys.stderr)
    return 1 if check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
