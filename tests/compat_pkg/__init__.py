"""The analysis's own helpers, installed nowhere — for ``tests/test_compat_code_shipping.py``.

As AGC keeps its helpers in a local ``utils/`` package next to its notebook, ``notebook.py`` imports
``compat_pkg.physics`` from the folder it sits in. The test copies both into a fresh folder and runs the script
from another one, so only the client's ``sys.path`` (the script's folder) can import this package; the workers
can run its functions only if the executor ships the module to them.
"""
