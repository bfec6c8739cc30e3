#!/usr/bin/env python
"""Run the pipeline's phase notebooks with papermill and render their HTML reports.

    python run_notebooks.py            # the main job: every phase, embedded data, configs/experiment_defaults.yaml
    python run_notebooks.py --help     # flags
    python run_notebooks.py --list     # phases, configs, past runs

The logic lives in `pipeline_lib.driver` (notebooks nbs/600_driver.ipynb to nbs/611_driver.cli.ipynb; `main` is in
`pipeline_lib.driver.cli`); this file is only the entry point.
"""
import os
import sys
from pathlib import Path


def _main() -> int:
    try:
        from pipeline_lib.driver.cli import main
    except ImportError as e:
        # Started with a Python that lacks the project (e.g. the system python): use the repo's venv if there is one.
        venv = Path(__file__).resolve().parent/'.venv'
        py = venv/('Scripts/python.exe' if os.name == 'nt' else 'bin/python')
        if py.exists() and Path(sys.prefix).resolve() != venv.resolve() and not os.environ.get('PIPELINE_REEXEC'):
            os.environ['PIPELINE_REEXEC'] = '1'
            os.execv(str(py), [str(py), str(Path(__file__).resolve()), *sys.argv[1:]])
        print(f'error: cannot import pipeline_lib ({e}) with {sys.executable}. Install the project first '
              '(make install, or pip install -e .) and run it with that environment\'s python, e.g. '
              '.venv/bin/python run_notebooks.py', file=sys.stderr)
        return 2
    return main()


if __name__ == '__main__':
    sys.exit(_main())
