"""Test configuration: tests/ is on sys.path, so test modules import `helpers`."""
