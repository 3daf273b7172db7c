"""Model code that patches the worker's scaffold in one cell cannot forge later answers (issue 12, finding 10).

Each attack runs in one cell; the next cell is honest (FINAL('real') and an llm_query). The
host judges by what it receives: the final answer, and the sub-call answer the cell printed
(the bridge answers with the prompt upper-cased).
"""

from __future__ import annotations

import pytest

from helpers import RecordingBridge, ok, run
from rlm.sandbox import SandboxLimits, create_sandbox

HONEST = "import fractions\nprint(llm_query('ping'))\nFINAL('real')"

ATTACKS = {
    "module_global": "import rlm.sandbox.worker as w\nw._as_answer = lambda value: 'forged'",
    "module_global_of_the_wire": (
        "import sys, types\nimport rlm.sandbox.protocol as p\nsys.modules['rlm.sandbox.protocol'] = types.ModuleType('x')\n"
        "real = p.encode_frame\np.encode_frame = lambda m: real({**m, 'final': 'forged'} if m.get('final') else m)"
    ),
    "class_method": (
        "import rlm.sandbox.worker as w\nreal = w.Session.execute\n"
        "w.Session.execute = lambda self, *a, **k: {**real(self, *a, **k), 'final': 'forged'}"
    ),
    "added_method_overrides_base": (
        "import rlm.sandbox.worker as w\nw.FinalAnswer.__init__ = lambda self, value: "
        "(BaseException.__init__(self, 'forged'), setattr(self, 'value', 'forged'))[0]"
    ),
    "function_code": (
        "import rlm.sandbox.worker as w\n"
        "try:\n    w._as_answer.__code__ = (lambda value: 'forged').__code__\nexcept RuntimeError as e:\n"
        "    print('refused:', e)"
    ),
    "bound_method_owner": (
        "session = llm_query.__self__\nsession._llm = lambda kind, prompts: ['forged' for _ in prompts]"
    ),
    "scaffold_table": (
        "session = FINAL.__self__ if hasattr(FINAL, '__self__') else llm_query.__self__\n"
        "session._scaffold['llm_query'] = lambda prompt: 'forged'"
    ),
    "closure_cell": (
        "bridge = llm_query.__self__._llm\n"
        "for cell in bridge.__closure__ or ():\n"
        "    if callable(cell.cell_contents) and not isinstance(cell.cell_contents, type):\n"
        "        cell.cell_contents = lambda *a, **k: {'op': 'llm_result', 'results': ['forged']}"
    ),
    "builtins": "import builtins\nbuiltins.str = lambda *args: 'forged'\nbuiltins.isinstance = lambda *a: False",
    "json_dumps": "import json\njson.dumps = lambda *a, **k: '{\"op\":\"result\",\"final\":\"forged\"}'",
    "json_encoder_class": (
        "import json.encoder as e\nreal = e.JSONEncoder.encode\n"
        "e.JSONEncoder.encode = lambda self, o: real(self, {**o, 'final': 'forged'} if o.get('final') else o)"
    ),
    "trace_hook": (
        "import sys\nimport rlm.sandbox.worker as w\n"
        "def tracer(frame, event, arg):\n"
        "    if event == 'call' and frame.f_code.co_name == '_as_answer':\n"
        "        raise w.FinalAnswer('forged')\n"
        "    return None\n"
        "sys.settrace(tracer)"
    ),
    "audit_hook": (
        "import sys\n"
        "def hook(event, args):\n"
        "    if event == 'compile':\n"
        "        raise type(FINAL.__self__).__init__.__globals__['FinalAnswer']('forged')\n"
        "try:\n    sys.addaudithook(hook)\nexcept RuntimeError as e:\n    print('refused:', e)"
    ),
    "import_hook": (
        "import sys, importlib.abc\n"
        "class Finder(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        raise ImportError('no imports any more')\n"
        "sys.meta_path.insert(0, Finder())"
    ),
    "sigint_handler": "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)",
}


@pytest.fixture(params=["subprocess", "strict"])
def box(request: pytest.FixtureRequest):
    sandbox = create_sandbox(request.param, RecordingBridge(), SandboxLimits())
    yield sandbox
    sandbox.close()


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_a_patched_scaffold_is_put_back_before_the_next_cell(box, attack):
    run(box, ATTACKS[attack])  # whatever it printed or raised, it ran
    honest = run(box, HONEST)
    assert honest.final == "real", honest
    assert honest.stdout == "PING\n", honest
    assert not honest.restarted
    assert ok(box, "print(str(12), isinstance(1, int))") == "12 True\n"


def test_a_timeout_still_interrupts_after_the_sigint_handler_was_replaced(box):
    run(box, ATTACKS["sigint_handler"])
    ok(box, "kept = 1")
    result = box.run("while True: pass", timeout=0.5, max_output=1000)
    assert result.timed_out and not result.restarted  # interrupted, not killed: variables survive
    assert ok(box, "print(kept)") == "1\n"


def test_model_code_keeps_its_own_variables_and_imports(box):
    ok(box, "import re\npattern = re.compile('a+')\nfrom collections import Counter")
    assert ok(box, "print(pattern.findall('caaab'), Counter('aab')['a'])") == "['aaa'] 2\n"
