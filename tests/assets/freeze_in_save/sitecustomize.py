"""Fault injection for tests/integration/test_train.py, loaded by every Python process whose PYTHONPATH starts
with this folder (Python imports `sitecustomize` at start-up).

With VIDEO_ENS_FREEZE_IN_SAVE=<step> set, the rank-0 training worker stops itself (SIGSTOP) in the middle of saving
the checkpoint of that step: after every rank's DeepSpeed files are written into `<tag>.partial/` and flushed,
before `complete.json` and the rename that commit it. It first writes `<run>/frozen_in_save` so the test knows the
job is frozen at exactly that point and can SIGKILL all of it, as a node failure would. Production code carries
no hook for this: the patch wraps `video_ens.engine._fsync_tree` when that module is first imported.
"""

import os
import signal
import sys

_STEP = os.environ.get("VIDEO_ENS_FREEZE_IN_SAVE")

if _STEP and os.environ.get("RANK") == "0" and os.environ.get("TORCHELASTIC_RUN_ID"):
    import importlib.abc
    import importlib.machinery

    class _PatchEngine(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "video_ens.engine":
                return None
            sys.meta_path.remove(self)
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            exec_module = spec.loader.exec_module

            def exec_and_patch(module):
                exec_module(module)
                real = module._fsync_tree
                target = module.step_tag(int(_STEP)) + module.PARTIAL

                def fsync_then_freeze(path):
                    real(path)
                    if path.name == target:
                        (path.parent.parent / "frozen_in_save").write_text(str(path))
                        os.kill(os.getpid(), signal.SIGSTOP)

                module._fsync_tree = fsync_then_freeze

            spec.loader.exec_module = exec_and_patch
            return spec

    sys.meta_path.insert(0, _PatchEngine())
