from fgpipe.cli import main

main()
