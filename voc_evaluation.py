#!/usr/bin/env python3
"""VOC2007 AP/mAP of a backend against TensorFlow's accuracy: not implemented yet (its own issue)."""

import sys

if __name__ == "__main__":
    print("error: voc_evaluation.py is not implemented yet; use detect_objects.py for now", file=sys.stderr)
    sys.exit(2)
