import os
import sys

# the tests import the project's files (vqvae.py, train.py, ...) from the repository root
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
