def add_arguments(p, flag):
    p.add_argument("path")


def cmd_verify(args):
    return 0
