# The kernel guard: every phase kernel the driver starts runs this file first (`python -c`, from the pinned kernel
# spec that pipeline_lib.driver.execute.pin_kernel writes), then ipykernel. When the driver dies it kills the
# kernel's process group; at exit it terminates what the kernel leaves behind. nbs/610_driver.execute.ipynb says why.
# A plain resource file, committed and edited here: nbdev does not generate it.
import atexit, os, signal, sys, threading, time

def _pipeline_guard():
    parent = int(os.environ.get('JPY_PARENT_PID') or 0)
    if os.name != 'posix' or os.environ.get('PIPELINE_KERNEL_GUARD') != '1' or not parent or os.getppid() != parent: return
    if os.getpgrp() != os.getpid(): return
    def _reap():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try: os.killpg(os.getpid(), signal.SIGTERM)
        except OSError: pass
    atexit.register(_reap)
    def _poll():
        while True:
            time.sleep(0.2)
            if os.getppid() != parent:
                try: os.killpg(os.getpid(), signal.SIGKILL)
                finally: os._exit(1)
    threading.Thread(target=_poll, name='pipeline-parent-guard', daemon=True).start()

if __name__ == '__main__':   # run with `python -c`; importing this module starts nothing
    try: _pipeline_guard()
    except Exception: pass  # never stop a kernel from starting
    sys.argv[0] = 'ipykernel_launcher'
    from ipykernel import kernelapp
    kernelapp.launch_new_instance()
