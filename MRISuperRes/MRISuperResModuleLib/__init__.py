"""Slicer-side helpers of the MRISuperRes module (Qt-free, torch-free).

A package rather than files beside MRISuperRes.py: Slicer treats every .py file in a scripted-module
folder as a module of its own.
"""
