from absl import flags


def pytest_configure(config):
    # absl apps read FLAGS; under pytest nothing parses argv, so mark defaults as parsed.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
