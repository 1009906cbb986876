"""pytest configuration for tests/python.

The helper module op_cases.py holds assertions (compare, check_close, ...) used by
test_moe_op.py and test_moe_op_errors.py; register it for pytest's assertion
rewriting so its failures report the compared values, as they did when the helpers
lived in the test module. Helpers are imported by plain module name (like
reference.py): pytest puts this folder on sys.path.
"""

import pytest

pytest.register_assert_rewrite("op_cases")
