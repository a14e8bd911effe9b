"""The ``one_market`` MAD: the process oned talks to for every marketplace action.

- :mod:`onemarket.madstart`: the start-up as oned runs it (arguments, fds, ``INIT FAILURE``);
- :mod:`.options`: the stock MAD's options;
- :mod:`.driver`: the loop that reads requests, dispatches them and answers each once;
- :mod:`.children`: one action's process: spawn or fork, pipes, exit, kill;
- :mod:`.lines`: bounded line splitting (oned's requests, an action's stderr);
- :mod:`.failures`: an action's outcome and failure text, action data scrubbed.

What IMPORT and DELETE mean before a driver runs is in :mod:`onemarket.workflow`, shared with
the action runner.
"""
