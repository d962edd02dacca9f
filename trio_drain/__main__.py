from ._cli._main import main

main()
