"""Offline training and evaluation of the CMT modules (imports the components from `service`)."""
