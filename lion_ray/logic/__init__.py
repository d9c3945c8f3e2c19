"""Pure logic: no Ray, torch or network imports, so it is fast to test and easy to reuse."""
