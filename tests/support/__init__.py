"""Helpers shared by test modules (plain functions and classes; fixtures stay in conftest.py files).

Test modules import helpers only from here, never from another test module or a conftest.
"""
