# The two commands a newcomer needs (see README.md):
#   make demo   sets up .venv and trains + evaluates a tiny DeiT on the built-in digits data
#   make test   sets up .venv and runs the test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: venv demo video-demo compare test clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) tools/run_net.py --cfg configs/demo/DeiT_Ti_digits.yaml

# The video path end to end: renders the synthetic motion videos, trains and tests a tiny XViT on them.
video-demo: venv
	$(PY) tools/make_video_demo_data.py --out demo_videos --overwrite
	$(PY) tools/run_net.py --cfg configs/demo/XViT_motion.yaml

# Every method against the dense digits demo under one protocol: one table and the frontier plots (about 15 min).
compare: venv
	$(PY) tools/compare_methods.py

test: venv
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs demo_videos *.egg-info
