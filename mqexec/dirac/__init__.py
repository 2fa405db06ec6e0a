"""mqexec workers as DIRAC jobs: the ``mqexec worker`` payload, queue-depth demand, and sealed credentials.

    from mqexec.dirac import DiracSettings, DiracWorkers, rabbitmq_bootstrap
    workers = DiracWorkers(DiracSettings(
        "https://dirac.example.org:8443", broker="amqps://me:pw@broker.example.org:5671/v",
        bootstrap=rabbitmq_bootstrap("https://broker.example.org:15671", admin=("adm", pw)),
        sites=["LCG.UKI-LT2-Brunel.uk"], cores=8, walltime="24h", idle_timeout="10m",
        image="docker://registry/mqexec-worker:py3.11"))
    workers.scale(jobs=20)                 # or workers.adapt(minimum=0, maximum=100): follows the task queue
    with workers.client() as client:       # a Client that signs with this run's key
        client.map(process, chunks)
    workers.jobs()                         # [JobInfo(job_id, status, minor_status, site, since, ...)]
    workers.close()                        # kills the jobs, stops their workers at once, deletes the boot user

No secret goes into the JDL (site and VO admins can read JDLs): the jobs fetch their worker's environment
sealed to their own delegated proxy from a key service next to the submitter. One module per job::

    sealing.py    proxy chains, sealing to a public key, signing: the hello/reply of one job
    keys.py       the run's KeyService, the in-job boot(), worker_environment(), the bootstrap account
    workers.py    DiracSettings, DiracWorkers (scale/adapt/close), halt_workers(), queue_depth()
    progress.py   the time to the first worker, printed by ``mqexec submit dirac``
    state.py      the state file of ``mqexec jobs`` (which jobs are yours, and the run's config)
    cli.py        ``mqexec submit dirac`` / ``mqexec jobs [kill|clean]`` / ``mqexec dirac-boot``

Importing this package costs only the standard library; ``dirac_submit``, ``requests``, ``cryptography`` and
``kombu`` load when used.
"""

from __future__ import annotations

from .cli import register_cli
from .keys import BOOT_QUEUE_ENV, BOOT_URL_ENV, KeyService, boot, rabbitmq_bootstrap, worker_environment
from .sealing import BootError, Identity, answer_hello, open_reply
from .state import state_path
from .workers import DiracSettings, DiracWorkers, halt_workers, queue_depth

__all__ = [
    "BOOT_QUEUE_ENV",
    "BOOT_URL_ENV",
    "BootError",
    "DiracSettings",
    "DiracWorkers",
    "Identity",
    "KeyService",
    "answer_hello",
    "boot",
    "halt_workers",
    "open_reply",
    "queue_depth",
    "rabbitmq_bootstrap",
    "register_cli",
    "state_path",
    "worker_environment",
]
