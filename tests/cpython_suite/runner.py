"""Run CPython's own ``test_concurrent_futures`` process-pool tests against distexec.

No CPython test code lives in this repository: the test classes are imported from the running
interpreter's ``test`` package (the single module ``test/test_concurrent_futures.py`` of 3.10 and
3.11, or the package ``test/test_concurrent_futures/`` of 3.12+) and subclassed with a mixin that
builds a :class:`distexec.DistributedExecutor` wherever the tests build a ProcessPoolExecutor.

Usage (the interpreter must ship the ``test`` package; distexec, cloudpickle and tblib must be
importable, e.g. through PYTHONPATH)::

    python3.13 tests/cpython_suite/runner.py [-v] [--list] [-k PATTERN]
        [--include TEST] [--exclude TEST] [--executor module:Class]
        [--per-test-timeout S] [--deadlock-timeout S] [--strict-env]

Exit status: 0 every selected test passed, 1 failures or errors, 2 setup problem.

Tests that cannot apply to distexec are listed, each with its reason, in :data:`EXCLUDED` (the
only exclusion table); they are reported as skipped. ``--include NAME`` runs one anyway.

How the tests are adapted (also printed in the summary; see :data:`ADAPTATIONS`): the executor
class the tests instantiate is a factory that takes ProcessPoolExecutor's signature and drops the
``mp_context`` argument; ``get_context()`` returns a stand-in whose start method is "spawn",
whose ``Manager()`` is the spawn context's, and which skips any test that asks it for other
multiprocessing objects; ExecutorDeadlockTest's result
timeout is lowered and its deadlock handler no longer needs ``_processes``; the failing-initializer
test looks for the initializer's error in distexec's logger instead of the stdlib pools' logger;
the tests that run a child interpreter get one that can import distexec.

Every test runs under a watchdog: after ``--per-test-timeout`` seconds the thread stacks are
dumped and the test is interrupted (it fails with ``TestTimeout``); executors it created are shut
down without waiting. A run in which a test hung ends with ``os._exit`` so that a wedged executor
cannot keep the interpreter alive; whoever started the runner should kill its process group.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import gc
import importlib
import logging
import os
import pkgutil
import signal
import sys
import threading
import time
import unittest
import weakref

# ---------------------------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------------------------

# CPython mixins we run, with the label used in our class names. All exist in 3.10 and 3.13.
TEST_MIXINS = (
    ("ProcessPoolExecutorTest", "Executor"),  # includes ExecutorTest
    ("ProcessPoolShutdownTest", "Shutdown"),  # includes ExecutorShutdownTest
    ("WaitTests", "Wait"),
    ("AsCompletedTests", "AsCompleted"),
    ("InitializerMixin", "Initializer"),
    ("FailingInitializerMixin", "FailingInitializer"),
    ("ExecutorDeadlockTest", "Deadlock"),
)

INTERNALS = "PPE internals"   # inspects or relies on ProcessPoolExecutor-only machinery
SEMANTICS = "semantics"       # a deliberate, documented difference of distexec

_PPE = "ProcessPoolExecutorTest"
_SHUT = "ProcessPoolShutdownTest"
_DEAD = "ExecutorDeadlockTest"
_OWN_PPE = ("constructs futures.ProcessPoolExecutor itself (not executor_type) and inspects its "
            "_processes/_call_queue/_executor_manager_thread")

# The one exclusion table: (CPython mixin, test method) -> (category, reason).
EXCLUDED: dict[tuple[str, str], tuple[str, str]] = {
    (_PPE, "test_max_workers_too_large"): (
        INTERNALS, "Windows-only limit; constructs futures.ProcessPoolExecutor itself"),
    (_PPE, "test_killed_child"): (
        INTERNALS, "kills a worker through executor._processes and expects the whole pool to "
        "break (distexec would fail only that task and stay usable)"),
    (_PPE, "test_traceback"): (
        INTERNALS, "asserts that exc.__cause__ is concurrent.futures.process._RemoteTraceback "
        "(distexec keeps the remote traceback on the exception itself, via tblib)"),
    (_PPE, "test_saturation"): (
        INTERNALS, "counts executor._processes; blocks workers on an mp_context.Semaphore"),
    (_PPE, "test_idle_process_reuse_one"): (
        INTERNALS, "counts executor._processes (PPE's on-demand spawning)"),
    (_PPE, "test_idle_process_reuse_multiple"): (
        INTERNALS, "counts executor._processes (PPE's on-demand spawning)"),
    (_PPE, "test_max_tasks_per_child"): (
        INTERNALS, "counts executor._processes"),
    (_PPE, "test_max_tasks_per_child_defaults_to_spawn_context"): (
        INTERNALS, "reads executor._mp_context"),
    (_PPE, "test_python_finalization_error"): (
        INTERNALS, "makes the 2nd thread PPE starts (its queue feeder) fail and expects "
        "BrokenProcessPool; distexec starts one thread"),
    (_SHUT, "test_processes_terminate"): (
        INTERNALS, "counts executor._processes; blocks workers on an mp_context.Semaphore"),
    (_SHUT, "test_context_manager_shutdown"): (INTERNALS, _OWN_PPE),
    (_SHUT, "test_del_shutdown"): (INTERNALS, _OWN_PPE),
    (_SHUT, "test_shutdown_no_wait"): (INTERNALS, _OWN_PPE),
    (_SHUT, "test_cancel_futures"): (
        SEMANTICS, "a future is RUNNING only once a connected worker takes it, and workers "
        "start on first submit (~1 s to connect): shutdown(cancel_futures=True) right after "
        "the submits cancels all 50, while the test requires >= 1 to run (true for PPE, which "
        "marks max_workers+1 calls RUNNING as they enter its call queue, before any worker is up)"),
    (_DEAD, "test_shutdown_deadlock_pickle"): (
        INTERNALS, "joins executor._executor_manager_thread"),
    (_DEAD, "test_error_at_task_unpickle"): (
        SEMANTICS, "arguments that fail to unpickle on the worker fail that future with the "
        "original exception (here UnpicklingError), not BrokenProcessPool; the worker lives on"),
    (_DEAD, "test_exit_at_task_unpickle"): (
        SEMANTICS, "arguments that fail to unpickle on the worker fail that future with the "
        "original exception (here SystemExit), not BrokenProcessPool; the worker lives on"),
    (_DEAD, "test_exit_during_result_pickle_on_worker"): (
        SEMANTICS, "a result that cannot be pickled on the worker fails that future with "
        "distexec.TaskPicklingError (a pickle.PicklingError; __cause__ = the original "
        "exception, here SystemExit), not with the original exception"),
    (_DEAD, "test_error_during_result_unpickle_in_result_handler"): (
        SEMANTICS, "a result that cannot be unpickled in the parent fails that future with "
        "distexec.TaskUnpicklingError (a pickle.UnpicklingError), not BrokenProcessPool"),
    (_DEAD, "test_exit_during_result_unpickle_in_result_handler"): (
        SEMANTICS, "a result that cannot be unpickled in the parent (here: SystemExit) fails "
        "that future with distexec.TaskUnpicklingError, not BrokenProcessPool"),
}

# Tests known to run as they are or through the adaptations below. A test in none of EXCLUDED
# and REVIEWED still runs, but the summary flags it as new (a newer CPython added it).
REVIEWED = {
    _PPE: {"test_submit", "test_submit_keyword", "test_map", "test_map_exception",
           "test_map_timeout", "test_shutdown_race_issue12456", "test_no_stale_references",
           "test_max_workers_negative", "test_free_reference", "test_map_chunksize",
           "test_max_tasks_early_shutdown", "test_ressources_gced_in_workers"},
    _SHUT: {"test_run_after_shutdown", "test_interpreter_shutdown",
            "test_submit_after_interpreter_shutdown", "test_hang_issue12364",
            "test_hang_gh83386", "test_hang_gh94440"},
    "WaitTests": {"test_20369", "test_first_completed",
                  "test_first_completed_some_already_completed", "test_first_exception",
                  "test_first_exception_some_already_complete",
                  "test_first_exception_one_already_failed", "test_all_completed",
                  "test_timeout"},
    "AsCompletedTests": {"test_no_timeout", "test_zero_timeout", "test_future_times_out",
                         "test_duplicate_futures", "test_free_reference_yielded_future",
                         "test_correct_timeout_exception_msg"},
    "InitializerMixin": {"test_initializer"},
    "FailingInitializerMixin": {"test_initializer"},
    _DEAD: {"test_error_at_task_pickle", "test_crash_at_task_unpickle",
            "test_crash_during_func_exec_on_worker", "test_exit_during_func_exec_on_worker",
            "test_error_during_func_exec_on_worker", "test_crash_during_result_pickle_on_worker",
            "test_error_during_result_pickle_on_worker", "test_shutdown_deadlock",
            "test_crash_big_data",
            # Patches PPE's _ExecutorManagerThread/_ThreadWakeup, which distexec does not use:
            # here it is a map() of 100 tasks under an alarm. Harmless, so it runs.
            "test_gh105829_should_not_deadlock_if_wakeup_pipe_full"},
}

ADAPTATIONS = (
    "executor_type is a factory with ProcessPoolExecutor's signature that drops mp_context",
    "get_context() returns a stand-in: start method 'spawn', Manager() from the spawn context; "
    "asking it for other multiprocessing objects skips the test",
    "ExecutorDeadlockTest: TIMEOUT = --deadlock-timeout; _fail_on_deadlock does not use "
    "executor._processes",
    "FailingInitializer: the initializer's error is looked for in the executor package's "
    "logger, not in 'concurrent.futures'",
    "child-interpreter tests: 'from concurrent.futures import X' becomes an import from the "
    "executor's module, and the child gets our PYTHONPATH (not -I)",
    "gc.collect() before BaseTestCase's thread check (3.10 counts stopped Thread objects that "
    "only wait for the cyclic GC)",
)

# Tests that run a child interpreter through script_helper.assert_python_ok.
CHILD_SCRIPT_TESTS = {"test_interpreter_shutdown", "test_submit_after_interpreter_shutdown",
                      "test_hang_gh83386"}


# ---------------------------------------------------------------------------------------------
# Finding CPython's test classes
# ---------------------------------------------------------------------------------------------

def load_cpython_modules() -> list:
    """Import test.test_concurrent_futures (module, or package and its submodules)."""
    try:
        top = importlib.import_module("test.test_concurrent_futures")
    except unittest.SkipTest as exc:
        raise SystemExit(f"CPython skips test_concurrent_futures here: {exc}")
    except ImportError as exc:
        raise SystemExit(f"{sys.executable} has no test.test_concurrent_futures ({exc}); use "
                         "an interpreter that ships CPython's 'test' package")
    modules = [top]
    if hasattr(top, "__path__"):  # 3.12+: a package
        for info in sorted(pkgutil.iter_modules(top.__path__), key=lambda i: i.name):
            modules.append(importlib.import_module(f"{top.__name__}.{info.name}"))
    return modules


def find_class(modules, name):
    """The class *defined* (not merely imported) as ``name`` in one of ``modules``."""
    for mod in modules:
        obj = vars(mod).get(name)
        if isinstance(obj, type) and obj.__module__ == mod.__name__:
            return obj
    return None


# ---------------------------------------------------------------------------------------------
# Adapting the executor
# ---------------------------------------------------------------------------------------------

class NoMPContext:
    """What ``get_context()`` returns: the executor under test takes no multiprocessing context.

    ``get_start_method()`` answers "spawn" (workers are fresh interpreters), and ``Manager()``
    is the spawn context's (distexec's local workers can use its proxies); anything else
    (Semaphore, Queue...) skips the calling test, since the tests that ask for them pass them
    in ways only ProcessPoolExecutor's internals allow, or read its internals anyway.
    """

    def get_start_method(self, allow_none=False):
        return "spawn"

    def Manager(self):  # noqa: N802 - multiprocessing's name
        import multiprocessing

        return multiprocessing.get_context("spawn").Manager()

    def __getattr__(self, name):
        raise unittest.SkipTest(f"needs a real multiprocessing context (mp_context.{name})")

    def __repr__(self):
        return "<NoMPContext>"


# ProcessPoolExecutor's positional parameters, in order.
_PPE_POSITIONAL = ("max_workers", "mp_context", "initializer", "initargs")

# Executors created during the current test (so that a hung test can stop them).
CREATED: list = []


def make_executor_factory(executor_cls):
    """A class standing in for ``executor_type``: accepts ProcessPoolExecutor's signature,
    drops ``mp_context`` (None or a NoMPContext) and returns a genuine ``executor_cls``."""

    def __new__(cls, *args, **kwargs):
        if len(args) > len(_PPE_POSITIONAL):
            raise TypeError("too many positional arguments")
        for pname, value in zip(_PPE_POSITIONAL, args, strict=False):
            if pname in kwargs:
                raise TypeError(f"got multiple values for argument {pname!r}")
            kwargs[pname] = value
        ctx = kwargs.pop("mp_context", None)
        if ctx is not None and not isinstance(ctx, NoMPContext):
            raise TypeError(f"{executor_cls.__name__} takes no multiprocessing context ({ctx!r})")
        executor = executor_cls(**kwargs)
        # Reached through sys.modules, not as a global: a task whose function is a method of
        # one of our test classes pickles those classes by value (they live in __main__), and
        # with them the globals their code names; a list of weakrefs cannot be pickled.
        with contextlib.suppress(TypeError):
            sys.modules[__name__].CREATED.append(weakref.ref(executor))
        return executor

    return type(executor_cls.__name__, (), {
        "__new__": __new__, "wrapped": executor_cls, "__module__": __name__,
        "__doc__": f"Factory for {executor_cls.__module__}.{executor_cls.__qualname__}"})


def child_python_ok(orig, executor_cls, name):
    """Wrap script_helper.assert_python_ok for the child-interpreter tests.

    The scripts do ``from concurrent.futures import <name>``; that becomes an import of the
    executor under test, and the child inherits our PYTHONPATH (so it is not run with -I).
    """
    stdlib_import = f"from concurrent.futures import {name}"
    ours = f"from {executor_cls.__module__} import {executor_cls.__qualname__} as {name}"

    def assert_python_ok(*args, **env_vars):
        new_args = [a.replace(stdlib_import, ours) if isinstance(a, str) else a for a in args]
        if new_args == list(args):
            raise AssertionError(f"runner adaptation out of date: no {stdlib_import!r} in the "
                                 "child script")
        env_vars.setdefault("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
        env_vars.setdefault("__isolated", False)
        return orig(*new_args, **env_vars)

    return assert_python_ok


def make_executor_mixin(executor_mixin_base, factory, executor_cls, args):
    log_name = executor_cls.__module__.split(".")[0]

    class ExternalExecutorMixin(executor_mixin_base):
        # No `ctx` attribute: ExecutorMixin.setUp() calls executor_type(max_workers=..., **kw).
        executor_type = factory
        TIMEOUT = args.deadlock_timeout  # ExecutorDeadlockTest's result timeout

        def get_context(self):
            return NoMPContext()

        def setUp(self):
            if self._testMethodName in CHILD_SCRIPT_TESTS:
                self._patch_child_python()
            super().setUp()

        def _patch_child_python(self):
            cls = type(self)
            for base in cls.__mro__:
                mod = sys.modules.get(base.__module__)
                if mod is not None and self._testMethodName in vars(base) \
                        and hasattr(mod, "assert_python_ok"):
                    orig = mod.assert_python_ok
                    mod.assert_python_ok = child_python_ok(orig, executor_cls, factory.__name__)
                    self.addCleanup(setattr, mod, "assert_python_ok", orig)
                    return
            raise AssertionError("runner adaptation out of date: no assert_python_ok found "
                                 f"for {self._testMethodName}")

        def _fail_on_deadlock(self, executor):
            # CPython's version terminates executor._processes; ours just gives up on it.
            import tempfile
            with tempfile.TemporaryFile(mode="w+") as f:
                faulthandler.dump_traceback(file=f)
                f.seek(0)
                tb = f.read()
            with contextlib.suppress(Exception):
                executor.shutdown(wait=False, cancel_futures=True)
            self.fail(f"Executor deadlock (no result within {self.TIMEOUT}s):\n\n{tb}")

        @contextlib.contextmanager
        def _assert_logged(self, msg):
            # FailingInitializerMixin: the stdlib pools log a CRITICAL record on
            # 'concurrent.futures'; distexec logs the broken executor (with the initializer's
            # exception) on its own logger.
            with self.assertLogs(log_name, logging.ERROR) as cm:
                yield
            self.assertTrue(any(msg in line for line in cm.output), cm.output)

    return ExternalExecutorMixin


def _skipped(reason):
    @unittest.skip(reason)
    def test(self):
        pass
    return test


def _test_method_names(cls):
    return sorted(n for n in dir(cls) if n.startswith("test") and callable(getattr(cls, n)))


def build_classes(modules, executor_cls, args):
    base_case = find_class(modules, "BaseTestCase")
    executor_mixin = find_class(modules, "ExecutorMixin")
    if base_case is None or executor_mixin is None:
        raise SystemExit("BaseTestCase/ExecutorMixin not found: unknown layout of "
                         "test.test_concurrent_futures")
    factory = make_executor_factory(executor_cls)
    ours = make_executor_mixin(executor_mixin, factory, executor_cls, args)

    class CollectingBaseTestCase(base_case):
        # BaseTestCase.tearDown checks that threads are gone; 3.10's check also counts stopped
        # Thread objects that are merely waiting for the cyclic GC. Collect them first.
        def tearDown(self):
            gc.collect()
            super().tearDown()

    include, exclude = set(args.include), set(args.exclude)
    classes, plan = [], []
    for mixin_name, label in TEST_MIXINS:
        mixin = find_class(modules, mixin_name)
        if mixin is None:
            plan.append((mixin_name, None, "missing", "not in this CPython"))
            continue
        name = f"{executor_cls.__name__}{label}Test"
        bases = (ours, mixin, CollectingBaseTestCase)
        body = {"__module__": __name__, "__qualname__": name}
        for tname in _test_method_names(mixin):
            key = (mixin_name, tname)
            if key in EXCLUDED and tname not in include:
                category, why = EXCLUDED[key]
                status, why = "excluded", f"[{category}] {why}"
            elif tname in exclude:
                status, why = "excluded", "[--exclude]"
            elif tname in REVIEWED.get(mixin_name, ()) or tname in include:
                status, why = "run", ""
            else:
                status, why = "run", "NEW: not reviewed for this runner"
            if status != "run":
                body[tname] = _skipped(f"excluded: {why}")
            plan.append((name, tname, status, why))
        cls = type(name, bases, body)
        globals()[name] = cls
        classes.append(cls)
    return classes, plan


# ---------------------------------------------------------------------------------------------
# Watchdog
# ---------------------------------------------------------------------------------------------

class TestTimeout(Exception):
    """Raised in the main thread when a test overran --per-test-timeout."""


class Watchdog:
    """One daemon thread that interrupts the main thread when a test takes too long.

    The interruption is a signal (SIGUSR1, not SIGALRM: some tests use alarm()) whose handler
    raises TestTimeout; blocking waits in the main thread (locks, joins) are interruptible.
    After an interruption it re-arms with ``grace`` seconds so that a hanging tearDown is
    interrupted too; after ``max_fires`` interruptions of one test it exits the process.
    """

    def __init__(self, grace=20.0, max_fires=3):
        self.grace = grace
        self.max_fires = max_fires
        self.cond = threading.Condition()
        self.deadline = None
        self.label = ""
        self.fires = 0
        self.total_fires = 0
        self.main_ident = threading.main_thread().ident
        signal.signal(signal.SIGUSR1, self._on_signal)
        self.thread = threading.Thread(target=self._run, name="cpython-suite-watchdog",
                                       daemon=True)
        self.thread.start()

    def _on_signal(self, signum, frame):
        raise TestTimeout(f"{self.label} exceeded its time limit (see the stacks dumped above)")

    def arm(self, seconds, label):
        with self.cond:
            self.deadline = time.monotonic() + seconds
            self.label = label
            self.fires = 0
            self.cond.notify()

    def disarm(self):
        with self.cond:
            self.deadline = None
            self.cond.notify()

    def _run(self):
        with self.cond:
            while True:
                if self.deadline is None:
                    self.cond.wait()
                    continue
                left = self.deadline - time.monotonic()
                if left > 0:
                    self.cond.wait(left)
                    continue
                self.fires += 1
                self.total_fires += 1
                sys.stdout.flush()
                print(f"\n*** TIMEOUT: {self.label} (interruption {self.fires}); "
                      "thread stacks:", file=sys.stderr, flush=True)
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                if self.fires > self.max_fires:
                    print("*** the test cannot be interrupted; giving up", file=sys.stderr,
                          flush=True)
                    os._exit(3)
                self.deadline = time.monotonic() + self.grace
                signal.pthread_kill(self.main_ident, signal.SIGUSR1)


def stop_created_executors():
    """Shut down, without waiting, every executor the current test created."""
    for ref in CREATED:
        executor = ref()
        if executor is not None:
            with contextlib.suppress(Exception):
                executor.shutdown(wait=False, cancel_futures=True)


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------

class WatchedResult(unittest.TextTestResult):
    """Adds the watchdog, timings and the environment check of CPython's BaseTestCase."""

    watchdog: Watchdog | None = None
    per_test_timeout = 60.0
    strict_env = False

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.durations = []
        self.env_warnings = []
        self.timed_out = []

    def startTest(self, test):
        from test import support
        support.environment_altered = False
        CREATED.clear()
        self._t0 = time.monotonic()
        self._fires_before = self.watchdog.total_fires
        self.watchdog.arm(self.per_test_timeout, test.id())
        super().startTest(test)

    def stopTest(self, test):
        self.watchdog.disarm()
        from test import support
        if self.watchdog.total_fires != self._fires_before:
            self.timed_out.append(test.id())
            stop_created_executors()
        CREATED.clear()
        self.durations.append((time.monotonic() - self._t0, test.id()))
        if support.environment_altered:
            msg = "left threads or child processes behind (see 'Warning --' lines on stderr)"
            self.env_warnings.append((test.id(), msg))
            if self.strict_env:
                try:
                    raise AssertionError(msg)
                except AssertionError:
                    self.addFailure(test, sys.exc_info())
        super().stopTest(test)


def import_executor(spec):
    mod_name, _, qual = spec.partition(":")
    obj = importlib.import_module(mod_name)
    for part in (qual or "DistributedExecutor").split("."):
        obj = getattr(obj, part)
    return obj


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--executor", default="distexec:DistributedExecutor",
                   help="module:Class of the executor under test")
    p.add_argument("-v", "--verbose", action="count", default=1)
    p.add_argument("-q", "--quiet", action="store_const", const=0, dest="verbose")
    p.add_argument("-k", dest="patterns", action="append", default=[],
                   help="only run tests matching this substring or glob")
    p.add_argument("--include", action="append", default=[],
                   help="run this excluded test method anyway")
    p.add_argument("--exclude", action="append", default=[],
                   help="skip this test method as well")
    p.add_argument("--list", action="store_true", help="print the plan and exit")
    p.add_argument("--per-test-timeout", type=float, default=60.0,
                   help="interrupt a test (setUp to tearDown) after this many seconds")
    p.add_argument("--deadlock-timeout", type=float, default=30.0,
                   help="replaces ExecutorDeadlockTest.TIMEOUT")
    p.add_argument("--strict-env", action="store_true",
                   help="fail tests that leave threads or child processes behind")
    return p.parse_args(argv)


def distexec_threads():
    return [t for t in threading.enumerate()
            if t.name.startswith("distexec-") and t.is_alive()]


def main(argv=None):
    args = parse_args(argv)
    from test import support
    support.verbose = int(args.verbose >= 3)  # silences CPython's per-test "%.2fs" prints
    try:
        executor_cls = import_executor(args.executor)
    except Exception as exc:
        print(f"cannot import executor {args.executor!r}: {exc!r}", file=sys.stderr)
        return 2
    try:
        modules = load_cpython_modules()
    except SystemExit as exc:
        print(exc, file=sys.stderr)
        return 2
    layout = "package" if hasattr(modules[0], "__path__") else "module"
    classes, plan = build_classes(modules, executor_cls, args)
    header = (f"CPython test_concurrent_futures ({layout} {os.path.dirname(modules[0].__file__)})"
              f" on Python {sys.version.split()[0]} against {args.executor}")
    print(header, flush=True)
    if args.list:
        for cls_name, tname, status, why in plan:
            print(f"  {status:9} {cls_name}.{tname}  {why}".rstrip())
        return 0

    loader = unittest.TestLoader()
    if args.patterns:
        loader.testNamePatterns = [p if "*" in p else f"*{p}*" for p in args.patterns]
    suite = unittest.TestSuite(loader.loadTestsFromTestCase(cls) for cls in classes)
    if suite.countTestCases() == 0:
        print("no tests selected", file=sys.stderr)
        return 2

    WatchedResult.watchdog = Watchdog()
    WatchedResult.per_test_timeout = args.per_test_timeout
    WatchedResult.strict_env = args.strict_env
    runner = unittest.TextTestRunner(stream=sys.stdout, verbosity=min(args.verbose, 2),
                                     resultclass=WatchedResult)
    t0 = time.monotonic()
    result = runner.run(suite)
    elapsed = time.monotonic() - t0

    excluded = [(t, why) for t, why in result.skipped if why.startswith("excluded: ")]
    bad = len(result.failures) + len(result.errors) + len(result.unexpectedSuccesses)
    passed = result.testsRun - bad - len(result.skipped) - len(result.expectedFailures)
    print("=" * 70)
    print(header)
    print("Adaptations:")
    for line in ADAPTATIONS:
        print(f"  - {line}")
    print(f"Excluded ({len(excluded)}):")
    for test, why in excluded:
        print(f"  - {test.id().rpartition('.')[0].rpartition('.')[2]}.{test._testMethodName}: "
              f"{why[len('excluded: '):]}")
    for test, why in result.skipped:
        if not why.startswith("excluded: "):
            print(f"  SKIP  {test.id()}: {why}")
    for test, _ in result.failures + result.errors:
        print(f"  FAIL  {test.id()}")
    for tid in result.timed_out:
        print(f"  HUNG  {tid} (interrupted by the watchdog)")
    for tid, msg in result.env_warnings:
        print(f"  ENV   {tid}: {msg}")
    missing = [cls_name for cls_name, tname, status, why in plan if status == "missing"]
    for cls_name in missing:
        print(f"  MISSING  CPython class {cls_name} not found: update TEST_MIXINS")
    for cls_name, tname, _status, why in plan:
        if why.startswith("NEW"):
            print(f"  NEW   {cls_name}.{tname}: ran, but not reviewed for this runner")
    for dt, tid in sorted(result.durations, reverse=True)[:5]:
        print(f"  slow  {dt:6.2f}s {tid}")
    print(f"SUMMARY: Python {sys.version.split()[0]}: ran {result.testsRun} in {elapsed:.1f}s: "
          f"{passed} passed, {len(result.failures)} failed, {len(result.errors)} errors, "
          f"{len(result.skipped)} skipped ({len(excluded)} excluded)")
    sys.stdout.flush()
    sys.stderr.flush()
    rc = 0 if result.wasSuccessful() and not missing else 1
    if result.timed_out:
        # A wedged executor may never let the interpreter exit; its workers die with us (their
        # lifeline is our pipe) and our caller kills the process group anyway.
        os._exit(rc or 1)
    leftover = distexec_threads()
    if leftover:
        print(f"  ENV   still running after all tests: {leftover}", flush=True)
    # Bound interpreter shutdown (atexit hooks of executors the tests did not shut down).
    faulthandler.dump_traceback_later(60, exit=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
