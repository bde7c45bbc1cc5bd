"""The data path: listener -> identity -> policy -> upstream -> relay."""
